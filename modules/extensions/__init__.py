"""Users' extensions from extensions/: found at start, set up through a narrow API, a broken one skipped."""
