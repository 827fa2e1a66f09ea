"""A process with no TLS library until told to load one, then an HTTPS client: the agent must
probe a library loaded (dlopen) after it started watching.

stdin lines: `load` imports ssl (printing `loaded`); `<url> <ca-file>` GETs the URL and
prints the response body on one line."""
import sys

for line in sys.stdin:
    command = line.split()
    if command == ["load"]:
        import ssl  # noqa: F401  (maps libssl into this process)
        import urllib.request
        print("loaded", flush=True)
    else:
        url, ca_file = command
        context = ssl.create_default_context(cafile=ca_file)
        with urllib.request.urlopen(url, context=context, timeout=10) as response:
            print(response.read().decode(), flush=True)
