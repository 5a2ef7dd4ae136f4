"""Ray actors: thin shells that build a core or model object from config and expose its methods."""
