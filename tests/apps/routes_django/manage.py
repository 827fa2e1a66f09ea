"""Django project whose routes the agent reads from its urlconfs: an app's urls included under
a prefix, converters, and a static route next to a parameter."""
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
