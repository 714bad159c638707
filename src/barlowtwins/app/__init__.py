"""The application: recipes, the typed ``fit`` configuration, the ``fit`` pipeline, reports
and the ``barlowtwins`` command line."""
