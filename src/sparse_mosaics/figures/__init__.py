"""Paper-style figures. Every figure takes its colours and markers from :mod:`.style`."""
