"""Helpers the tests share: builders of real stores and models, real processes, the Dockerfile as data.

Test modules import from here, never from one another or from a conftest.
"""
