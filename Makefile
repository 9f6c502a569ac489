# The two commands: `make serve` installs and starts the server, `make test` installs and tests.
VENV ?= .venv
ARGS ?=

.PHONY: install serve test
install:
	@bash scripts/install.sh

serve: install
	$(VENV)/bin/genarm-serve $(ARGS)

test: install
	$(VENV)/bin/python -m pytest $(ARGS)
