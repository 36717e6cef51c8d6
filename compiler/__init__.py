"""effc.compiler: arrives with a later issue; the package exists so the layout and imports are fixed."""
