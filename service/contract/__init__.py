"""What training shares with serving: model cards, preprocessing and uncertainty summaries."""
