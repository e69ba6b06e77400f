"""The search stage: observing what a service uses, diagnosing a failure, tightening a spec, and the
scenario runs they try."""
