"""The sandbox stage: what each directive must deny (expectations), the verdict on probe results (verdict,
pure: results come through a ProbeHost) and what a machine can enforce (capabilities)."""
