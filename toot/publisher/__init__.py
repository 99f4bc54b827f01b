"""The publisher's side: ``publish()``, the outbox, the subscription store, and the drain
that fans events out and delivers them."""
