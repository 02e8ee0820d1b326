# Two commands do everything on a fresh Debian machine (as root, or with sudo):
#   make run    mount the built-in demo directory (SRC=demo/src MNT=demo/mnt) in the foreground
#   make test   run the whole test suite
#   make check  only the tests that need no kernel and no server (unit + ops), in 1-2.5 minutes
#   make bench / make bench-full   regenerate docs/benchmarks.md (quick: ~20 min, full: ~100 min with the soak;
#               on a 2-core VM; full needs ~25 GiB of free disk)
# All of them install what is missing first: the apt packages below and a .venv.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
SRC ?= demo/src
MNT ?= demo/mnt
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv git sqlite3 rsync tar vim-tiny
BENCH_APT_PACKAGES := borgbackup restic xdelta3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: run test check bench bench-full deps bench-deps apt-install venv clean

deps:
	@$(MAKE) --no-print-directory apt-install PACKAGES="$(APT_PACKAGES)"

# borg, restic and xdelta3 are what history_size compares the journal with (issues 4 and 20)
bench-deps:
	@$(MAKE) --no-print-directory apt-install PACKAGES="$(BENCH_APT_PACKAGES)"

apt-install:
	@missing=""; for p in $(PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

# pyfuse3 is rebuilt from its hash-checked sdist with tools/pyfuse3/patch.py (no OPENDIR/RELEASEDIR
# round trips, kernel-cached directory listings, a fallocate handler, security.capability answered in C,
# no scheduler pass for requests whose handler does not wait; see docs/fuse-notes.md). It is built once,
# into a wheel, before the package is installed, so pip never builds the stock pyfuse3 as well; only
# pyfuse3 comes from source (its build tools are wheels). deltafs works on a stock pyfuse3 too, only
# slower on directory-heavy work.
PYFUSE3_BUILD := build/pyfuse3
PYFUSE3_WHEEL_STAMP := $(PYFUSE3_BUILD)/.wheel
$(VENV)/bin/python: | deps
	$(PYTHON) -m venv $(VENV)

$(PYFUSE3_WHEEL_STAMP): tools/pyfuse3/patch.py tools/pyfuse3/requirements.txt | $(VENV)/bin/python
	rm -rf $(PYFUSE3_BUILD) && mkdir -p $(PYFUSE3_BUILD)/dist
	$(VENV)/bin/pip download -q --no-binary pyfuse3 --no-deps --require-hashes \
	  -r tools/pyfuse3/requirements.txt -d $(PYFUSE3_BUILD)
	tar -xzf $(PYFUSE3_BUILD)/pyfuse3-3.5.0.tar.gz -C $(PYFUSE3_BUILD)
	$(VENV)/bin/python tools/pyfuse3/patch.py $(PYFUSE3_BUILD)/pyfuse3-3.5.0
	SETUPTOOLS_SCM_PRETEND_VERSION=3.5.0 $(VENV)/bin/pip wheel -q --no-deps \
	  $(PYFUSE3_BUILD)/pyfuse3-3.5.0 -w $(PYFUSE3_BUILD)/dist
	touch $@

$(VENV)/.installed: pyproject.toml $(PYFUSE3_WHEEL_STAMP)
	$(VENV)/bin/pip install -q --force-reinstall --no-deps $(PYFUSE3_BUILD)/dist/pyfuse3-*.whl
	$(VENV)/bin/pip install -q -e '.[test]'
	$(VENV)/bin/python -c "import pyfuse3; assert {'dir_handle_is_inode', 'fallocate', 'nocaps_inodes', 'inline_loop', 'direct_loop', 'readdirplus_auto'} <= set(pyfuse3.DELTAFS_PATCHES)"
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

# The no-kernel tiers only (unit + ops): no FUSE, no S3 server, 1-2.5 minutes on 2 cores.
check: venv
	$(VENV)/bin/python -m pytest -m "unit or ops" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc = 5 ]; then echo "no tests were collected: failing"; exit 1; fi; exit $$rc

# The measurements of docs/benchmarks.md, one after the other, each writing its own
# section (--write-docs keeps the others'): the paired native/no-capture/capture table, then
# mirrors/log/diff/restore at scale, then journal size on edit histories, then encrypted
# mirrors against plain ones, then descriptors (peak descriptors and memory for 100k files, 1M in
# a full run; hot-path cost when the descriptor cache fits vs evicts), then the soak (throughput,
# latency and daemon memory per minute under a fixed offered load with compaction every 30 s:
# 10 min quick, 60 full). All run even if one fails; the exit status says whether any did.
# Ctrl-C stops the whole sequence.
BENCH_PROGRAMS := tools.bench tools.bench.scale tools.bench.history_size tools.bench.encrypted tools.bench.fds tools.bench.soak tools.bench.pastview
define run_benches
	@failed=""; for prog in $(BENCH_PROGRAMS); do \
	  echo "== $$(date -u +%H:%M:%S) python -m $$prog $(1)" >&2; start=$$(date +%s); \
	  $(VENV)/bin/python -m $$prog $(1); rc=$$?; \
	  echo "== $$prog: exit $$rc after $$(( $$(date +%s) - start )) s" >&2; \
	  if [ $$rc = 130 ]; then exit 130; fi; \
	  if [ $$rc != 0 ]; then failed="$$failed $$prog"; fi; \
	done; \
	if [ -n "$$failed" ]; then echo "bench: failed:$$failed (see above)" >&2; exit 1; fi
endef

bench: venv bench-deps
	$(call run_benches,--quick --write-docs)

bench-full: venv bench-deps
	$(call run_benches,--write-docs)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
