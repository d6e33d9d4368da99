/* terraseg train CONFIG.yaml [--set KEY=VALUE]... [--resume CKPT] [--print-config] [--print-schema]
 *
 * Resolves the configuration (defaults, the file, every --set in order,
 * --device last, the cross-field checks: train/config.h), prints it, and trains
 * (train/trainer.h). --set is repeatable (CLI_STRING_LIST). --print-config
 * prints the resolved configuration and exits without training;
 * --print-schema prints the key reference (Markdown) and needs no CONFIG.
 *
 * Exit status: 0 done (or early-stopped); 1 an error (message on stderr);
 * 2 usage or configuration errors; 130 stopped by SIGINT (Ctrl-C) and 143 by
 * SIGTERM, after last.safetensors was written: rerun with
 * --resume OUTPUT/last.safetensors to continue exactly where it stopped. */
#include "tools/cmd_train.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/backend.h"
#include "train/config.h"
#include "train/trainer.h"

static cli_strings tr_sets = {0};
static const char *tr_resume = NULL;
static int tr_print_config = 0;
static int tr_print_schema = 0;
static int tr_quiet = 0;
static int tr_plain = 0;
static const char *tr_device = NULL;
static const char *tr_precision = NULL;

cli_option train_options[] = {
    {"set", 's', CLI_STRING_LIST, &tr_sets, "KEY=VALUE",
     "override one configuration key (applied in order), e.g. --set optimizer.lr=1e-3", 0, 0},
    {"resume", 'r', CLI_STRING, &tr_resume, "CKPT",
     "continue a run exactly from a checkpoint (OUTPUT/last.safetensors or epoch-N.safetensors)", 0, 0},
    {"print-config", 0, CLI_FLAG, &tr_print_config, NULL, "print the resolved configuration and exit", 0, 0},
    {"print-schema", 0, CLI_FLAG, &tr_print_schema, NULL, "print every configuration key (Markdown) and exit", 0, 0},
    {"device", 0, CLI_STRING, &tr_device, "DEV",
     "where to train: cpu, cuda or cuda:N (sets the config's device and cuda_device, after every --set)", 0, 0},
    {"precision", 0, CLI_STRING, &tr_precision, "P",
     "fp32, bf16 or fp16: mixed precision on tensor cores (sets the config's precision, after every --set)", 0, 0},
    {"plain", 0, CLI_FLAG, &tr_plain, NULL, "plain log lines even on a terminal (no live progress line)", 0, 0},
    {"quiet", 'q', CLI_FLAG, &tr_quiet, NULL, "print errors only", 0, 0},
    {0},
};

int run_train(int argc, char **argv)
{
    int rc = 0;
    if (tr_print_schema) {
        char *md = NULL;
        if (ts_train_config_schema_markdown(&md)) {
            fprintf(stderr, "terraseg train: %s\n", ts_last_error());
            rc = 1;
        } else {
            fputs(md, stdout);
            free(md);
        }
        goto out;
    }
    if (argc != 1) {
        fprintf(stderr, "terraseg train: expected one CONFIG.yaml (see --help, docs/training-config.md)\n");
        rc = 2;
        goto out;
    }
    /* --device as two more --set and --precision as one, applied last. */
    char dev_set[3][48];
    const char **sets = malloc(((size_t)tr_sets.n + 3) * sizeof *sets);
    int n_sets = tr_sets.n;
    if (!sets) {
        fprintf(stderr, "terraseg train: out of memory\n");
        rc = 1;
        goto out;
    }
    for (int i = 0; i < tr_sets.n; i++) sets[i] = tr_sets.v[i];
    if (tr_device) {
        int cuda, idx;
        if (ts_device_parse(tr_device, &cuda, &idx) != TS_OK) {
            fprintf(stderr, "terraseg train: --device %s: %s\n", tr_device, ts_last_error());
            free(sets);
            rc = 2;
            goto out;
        }
        snprintf(dev_set[0], sizeof dev_set[0], "device=%s", cuda ? "cuda" : "cpu");
        snprintf(dev_set[1], sizeof dev_set[1], "cuda_device=%d", idx);
        sets[n_sets++] = dev_set[0];
        sets[n_sets++] = dev_set[1];
    }
    if (tr_precision) {
        /* The config's check names the accepted values when this one is wrong. */
        snprintf(dev_set[2], sizeof dev_set[2], "precision=%.30s", tr_precision);
        sets[n_sets++] = dev_set[2];
    }
    ts_train_config c;
    ts_status rst = ts_train_config_resolve(argv[0], sets, n_sets, &c);
    free(sets);
    if (rst) {
        fprintf(stderr, "terraseg train: %s\n", ts_last_error());
        rc = 2;
        goto out;
    }
    if (tr_print_config) {
        char *yaml = NULL;
        if (ts_train_config_format(&c, &yaml)) {
            fprintf(stderr, "terraseg train: %s\n", ts_last_error());
            rc = 1;
        } else {
            fputs(yaml, stdout);
            free(yaml);
        }
        ts_train_config_free(&c);
        goto out;
    }
    ts_train_run_opts o;
    ts_train_run_opts_init(&o);
    o.resume = tr_resume;
    o.install_signals = 1;
    o.print_config = !tr_quiet;
    o.progress = tr_quiet ? 2 : tr_plain ? 0 : -1;
    ts_train_result res;
    ts_status st = ts_train_run(&c, &o, &res);
    ts_train_config_free(&c);
    if (st) {
        fprintf(stderr, "terraseg train: %s\n", ts_last_error());
        rc = 1;
    } else if (res.interrupted) {
        rc = 128 + res.interrupted; /* 130 after SIGINT, 143 after SIGTERM */
    }
out:
    free(tr_sets.v);
    tr_sets.v = NULL;
    tr_sets.n = 0;
    return rc;
}
