"""The demo model pair: building small model directories, training the shipped pair."""
