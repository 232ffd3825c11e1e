"""Small shared helpers with no medvlm dependencies (the bottom layer)."""
