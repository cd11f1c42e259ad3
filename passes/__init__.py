"""Graph passes: ``analysis`` passes annotate ``node.meta["mpqc"]``; ``transform`` passes rewrite."""
