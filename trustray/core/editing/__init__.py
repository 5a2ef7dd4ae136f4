"""Knowledge editing: editors (one registry), edit sets."""
