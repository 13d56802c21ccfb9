"""The stages the numbered scripts run (00, 02, 03, 04), and the notebook's helpers that call them."""
