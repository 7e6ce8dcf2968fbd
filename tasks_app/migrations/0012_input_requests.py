import uuid

import django.db.models.deletion
import django.db.models.functions.datetime
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('tasks_app', '0011_approvals'),
    ]

    operations = [
        migrations.CreateModel(
            name='InputRequest',
            fields=[
                ('id', models.UUIDField(default=uuid.uuid4, editable=False, primary_key=True, serialize=False)),
                ('kind', models.CharField(default='permission', max_length=32)),
                ('tool', models.CharField(blank=True, max_length=200)),
                ('input', models.JSONField(blank=True, default=dict)),
                ('question', models.TextField(blank=True)),
                ('state', models.CharField(default='pending', max_length=16)),
                ('answer', models.JSONField(blank=True, null=True)),
                ('answered_by', models.CharField(blank=True, max_length=150)),
                ('created_at', models.DateTimeField(db_default=django.db.models.functions.datetime.Now())),
                ('expires_at', models.DateTimeField()),
                ('answered_at', models.DateTimeField(blank=True, null=True)),
                ('attempt', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='input_requests', to='tasks_app.attempt')),
                ('run', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='input_requests', to='tasks_app.run')),
                ('task', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='input_requests', to='tasks_app.task')),
            ],
            options={
                'ordering': ['created_at'],
                'indexes': [models.Index(condition=models.Q(('state', 'pending')), fields=['created_at'], name='input_pending_idx')],
                'constraints': [models.CheckConstraint(condition=models.Q(('state__in', ('pending', 'answered', 'expired'))), name='input_state_valid')],
            },
        ),
    ]
