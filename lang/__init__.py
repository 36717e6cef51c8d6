"""effc.lang: the .eff language front end (grammar, AST, checker, diagnostics, formatter)."""
