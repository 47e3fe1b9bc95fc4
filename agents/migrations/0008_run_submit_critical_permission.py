from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("agents", "0007_run_lost_attempts"),
    ]

    operations = [
        migrations.AlterModelOptions(
            name="run",
            options={
                "ordering": ["-submitted_at"],
                "permissions": [("submit_critical", "Can submit runs to the critical tier")],
            },
        ),
    ]
