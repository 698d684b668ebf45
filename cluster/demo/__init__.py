"""Building, training and distilling the models kvfleet ships for its demo."""
