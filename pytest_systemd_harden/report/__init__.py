"""The report stage: terminal/JSON/JUnit/HTML reports, exposure scores, baselines."""
