"""The subscriber's side: the handler registry, running handlers once per event, and
registering with each source."""
