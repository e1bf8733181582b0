"""The toy shapes world: its data, its teacher and its evaluation."""
