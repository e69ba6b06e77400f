"""The spec stage: a hardening spec loaded from YAML (spec.load), its directives, profiles, machine section and
releases. It knows backends and releases only by name."""
