"""malt runtime: what generated training programs import at run time."""
