"""Project scripts (set-up, the demo main job)."""
