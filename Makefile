# Two commands do everything on a fresh Debian machine (as root, or with sudo):
#   make run    mount the built-in demo directory (SRC=demo/src MNT=demo/mnt) in the foreground
#   make test   run the whole test suite
# Both install what is missing first: the apt packages below and a .venv.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
SRC ?= demo/src
MNT ?= demo/mnt
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv git sqlite3 rsync tar
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: run test bench bench-full deps venv clean

deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

$(VENV)/.installed: pyproject.toml | deps
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

venv: deps $(VENV)/.installed

run: venv
	@$(VENV)/bin/python tools/make_demo.py $(SRC)
	@mkdir -p $(MNT)
	@echo
	@echo "deltafs: mounting $(SRC) at $(MNT). In another shell, try:"
	@echo "  cd $(CURDIR)"
	@echo "  echo 'buy milk' >> $(MNT)/notes/todo.md"
	@echo "  $(VENV)/bin/deltafs log $(MNT)"
	@echo "  ls -la $(MNT) $(SRC)        # the same files; SRC/.deltafs holds the journal"
	@echo "Press Ctrl-C here to unmount."
	@echo
	$(VENV)/bin/deltafs mount --foreground $(SRC) $(MNT)

# pytest exit status 5 means no test ran: that is a failure too.
test: venv
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc = 5 ]; then echo "no tests were collected: failing"; exit 1; fi; exit $$rc

bench: venv
	$(VENV)/bin/python -m tools.bench --quick

bench-full: venv
	$(VENV)/bin/python -m tools.bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
