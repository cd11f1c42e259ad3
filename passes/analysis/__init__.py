"""Analysis passes: each writes facts into ``node.meta["mpqc"]`` and changes nothing else."""
