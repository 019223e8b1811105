"""HTTP routes: thin handlers (decode -> service -> encode), one module per route family."""
