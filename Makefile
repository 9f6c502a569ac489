# The two commands: `make serve` installs and starts the server, `make test` installs and tests.
VENV ?= .venv
ARGS ?=

.PHONY: install serve test
install:
	@bash scripts/install.sh

serve: install
	$(VENV)/bin/genarm-serve $(ARGS)

test:
	@GENARM_WITH_BROWSER=1 bash scripts/install.sh
	$(VENV)/bin/python -m pytest $(ARGS)
