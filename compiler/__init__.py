"""effc.compiler: the IR (networkx), its passes, the cost estimate; fx lowering to come."""
