"""``python -m bench`` (``make bench``): the article's configuration against ours, measured."""
