"""The scoring job: its config, plan, CPU stage, model actor and Ray wiring."""
