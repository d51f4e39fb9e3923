"""HTTP routes of the online API."""
