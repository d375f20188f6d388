"""What every job shares: configs, tracking, redaction, lineage, Ray sessions, atomic files and fault drills."""
