# Two commands do all set-up on a fresh Debian machine: `make run` and `make test`.
# Both are idempotent: they reuse the venv and running services.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
CONCURRENCY ?= 50

.PHONY: help venv services services-stop services-status browser run api test lint bench bench-compare bench-instructions loadtest faults screenshots clean

help:
	@echo "make run            set up, start beanstalkd + nx-27017, run a consumer (simulated sending)"
	@echo "make api            set up, start the services, serve the HTTP API (mailer-api) on 127.0.0.1:8025"
	@echo "make test           set up, start the services, run lint and the whole test suite"
	@echo "make services       start beanstalkd (127.0.0.1:11300) and nx-27017 (127.0.0.1:27017)"
	@echo "make services-stop  stop them (by their pid files in .data/)"
	@echo "make loadtest       10,000 mails through producer -> consumer, with a summary"
	@echo "make bench          the benchmark matrix -> bench/results.json + bench/results.md"
	@echo "make bench-compare BEFORE=rev   that matrix for rev and this tree, interleaved -> bench/compare.*"
	@echo "make bench-instructions BEFORE=rev   instructions per mail (clients, nx-27017), rev and this tree (valgrind)"
	@echo "make faults         the fault scenarios with their figures table"
	@echo "make screenshots    the console screenshot in docs/ (the browser test)"

$(STAMP): pyproject.toml constraints.txt
	@if [ ! -x "$(PY)" ]; then \
	  python3 -m venv $(VENV) 2>/dev/null || { \
	    echo "installing python3-venv (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null && \
	    rm -rf $(VENV) && python3 -m venv $(VENV); }; \
	fi
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev,fast]'
	@touch $(STAMP)

venv: $(STAMP)

services: $(STAMP)
	@VENV=$(VENV) scripts/services.sh start

services-stop:
	@scripts/services.sh stop

services-status:
	@scripts/services.sh status

run: services
	$(VENV)/bin/mailer-consumer --concurrency $(CONCURRENCY)

api: services
	$(VENV)/bin/mailer-api

lint: $(STAMP)
	$(VENV)/bin/ruff check mailer tests loadtest
	$(VENV)/bin/ruff format --check mailer tests loadtest
	$(VENV)/bin/mypy

# Debian's chromium for the console's browser tests (Playwright drives it; never a downloaded browser).
browser:
	@command -v chromium >/dev/null 2>&1 || { echo "installing chromium (apt-get)"; \
	  apt-cache show chromium >/dev/null 2>&1 || apt-get update -qq; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# pytest's exit 5 (no tests ran) is a failure here like any other non-zero exit.
test: services lint browser
	$(VENV)/bin/pytest $(PYTEST_ARGS)

loadtest: services
	$(PY) -m loadtest $(ARGS)

bench: services
	$(PY) -m loadtest.bench $(ARGS)

# Whether a change made a ratio worse: both trees' bench in interleaved rounds, one baseline each round.
bench-compare: services
	@test -n "$(BEFORE)" || { echo "usage: make bench-compare BEFORE=<git revision> [ARGS='--rounds 5']"; exit 2; }
	$(PY) -m loadtest.compare --before $(BEFORE) $(ARGS)

# Whether a change made the code do more work per mail: instruction counts (noise-free, valgrind).
bench-instructions: services
	@test -n "$(BEFORE)" || { echo "usage: make bench-instructions BEFORE=<git revision> [ARGS='--repeats 2']"; exit 2; }
	@command -v valgrind >/dev/null 2>&1 || { echo "installing valgrind (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null; }
	$(PY) -m loadtest.instructions --before $(BEFORE) $(ARGS)

# Only this target (and bench) rewrites the committed figures; `make test` prints them only.
# The README's console screenshot (docs/console-mail.png), taken by the browser test.
screenshots: services browser
	MAILER_WRITE_FIGURES=1 $(VENV)/bin/pytest tests/service/test_console_browser.py -p no:randomly $(PYTEST_ARGS)

faults: services
	MAILER_WRITE_FIGURES=1 $(VENV)/bin/pytest tests/faults -m slow -p no:randomly $(PYTEST_ARGS)

clean: services-stop
	rm -rf .data $(VENV) *.egg-info
