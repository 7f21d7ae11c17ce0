"""The synthetic orthomosaic generator (a user-facing tool, and every test's data)."""
