"""Offline evaluation of retrieval and voting quality over a project's labelled images."""
