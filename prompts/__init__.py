"""Keel prompt registry: versioned Jinja2 templates, labels, sandboxed rendering, export/import.

Entry points: `prompts.factory.build_registry(settings)`, `app.api.routes.prompts.router`,
`app.cli.prompts.app`. Nothing is imported or started here.
"""
