from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("agents", "0009_run_delegation"),
    ]

    operations = [
        migrations.AddField(
            model_name="run",
            name="attempt_errors",
            field=models.JSONField(
                blank=True,
                default=list,
                help_text="The error of each failed attempt (attempt, type, message, traceback), oldest first.",
            ),
        ),
        migrations.AddField(
            model_name="run",
            name="log",
            field=models.TextField(
                blank=True,
                default="",
                help_text="What the agent logged through ctx.logger, cut at RUN_LOG_MAX_BYTES.",
            ),
        ),
    ]
