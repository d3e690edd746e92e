"""malt compiler: load -> validate -> lower -> passes -> render, and the CLI."""
