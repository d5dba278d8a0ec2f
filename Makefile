# cvmotion: two entry points for a fresh Linux machine with python3, gcc and make.
#   make demo   set up .venv, build the guests, run the main job
#   make test   set up .venv, build the guests, run the whole suite (lint, types, layers, tests)
#   make mutants  disable each listed security check in turn; every one must fail a default-suite test
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
GUEST_CC     ?= gcc
GUEST_CFLAGS := -m32 -march=i686 -ffreestanding -fno-pic -fno-pie -fno-stack-protector -fno-builtin \
                -nostdlib -O2 -Wall -Wextra -Werror -std=c11 -mno-sse -mno-mmx -mno-80387
GUEST_DIR    := guests
GUEST_OUT    := build/guests
GUEST_COMMON := $(wildcard $(GUEST_DIR)/lib/*.c)
GUEST_HDRS   := $(wildcard $(GUEST_DIR)/lib/*.h $(GUEST_DIR)/lib/*.S)
GUEST_NAMES  := $(basename $(notdir $(filter-out $(GUEST_COMMON),$(wildcard $(GUEST_DIR)/*.c))))
GUEST_IMAGES := $(addprefix $(GUEST_OUT)/,$(addsuffix .elf,$(GUEST_NAMES)))

NATIVE_CC  ?= gcc
NATIVE_LIB := build/native/libcvmgcm.so

.PHONY: all venv guests native demo test lint bench mutants clean
all: guests native venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(STAMP)

guests: $(GUEST_IMAGES)

$(GUEST_OUT)/%.elf: $(GUEST_DIR)/%.c $(GUEST_COMMON) $(GUEST_HDRS) $(GUEST_DIR)/lib/link.ld
	@mkdir -p $(GUEST_OUT)
	$(GUEST_CC) $(GUEST_CFLAGS) -I$(GUEST_DIR)/lib -T $(GUEST_DIR)/lib/link.ld -Wl,-m,elf_i386 \
	    -no-pie -static -Wl,--build-id=none -o $@ $(GUEST_DIR)/lib/entry.S $< $(GUEST_COMMON)

# The SP's per-bundle AES-GCM (native/cvmgcm.c). It binds an OpenSSL 3 libcrypto at run time (the newest on the
# machine: cvmotion/firmware/native_gcm.py), so building it needs no OpenSSL. Optional: without it the firmware
# seals page by page in Python.
native: $(NATIVE_LIB)

$(NATIVE_LIB): native/cvmgcm.c
	@mkdir -p $(dir $@)
	@$(NATIVE_CC) -O2 -Wall -Wextra -Wpedantic -Werror -shared -fPIC -o $@ $< -ldl \
	    || { rm -f $@; echo "note: $@ not built: the emulated SP seals pages in Python"; }

demo: venv guests native
	$(VENV)/bin/cvmotion demo

lint: venv
	$(VENV)/bin/ruff check cvmotion tests bench tools
	$(VENV)/bin/ruff format --check cvmotion tests bench tools
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: venv guests native lint
	$(VENV)/bin/pytest -q

bench: venv guests native
	$(PY) bench/run_all.py

# Not part of `make test` (about 10 minutes): the mutation check of tools/mutant_checks.py.
mutants: venv guests native
	$(PY) tools/mutants.py

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
