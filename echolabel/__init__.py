"""echolabel: similarity-based pre-annotation ML backend for Label Studio."""
