"""hat-toy: a test-only plugin (toy detector, toy dataset, toy metric)."""
