"""One router per resource: health, label sets, classify."""
