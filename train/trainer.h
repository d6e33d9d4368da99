/* The trainer: `terraseg train CONFIG.yaml` as a library call.
 *
 * ts_train_run() puts the building blocks together:
 *   data     every image of data.images opened (io/raster.h, normalization
 *            resolved at open), its labels (io/labels.h), windows on a grid or
 *            from windows.csv (io/windows.h), thinned by drop_background /
 *            max_nodata (io/tile.h), split by spatial blocks or by the CSV's
 *            split column. Training windows go to a shuffling, augmenting
 *            loader; validation windows to one without either (io/loader.h).
 *            Every loader worker reads through its own raster clone and
 *            labels handle. Pixels the raster marks invalid get ignore_id.
 *   model    model.init: scratch (ts_unet_init_random with the config seed),
 *            imagenet (encoder from model.weights), or model (any file
 *            ts_model_load reads; allow_new_head lets the head differ). The
 *            model card: the classes, tile size and ignore id of the config
 *            plus the bands with the normalization the FIRST image resolved.
 *   loop     epochs x batches; gradient accumulation over train.accumulate
 *            micro-batches (loss scaled 1/k; an epoch's tail of fewer than k
 *            micro-batches still makes one step), clipping and AdamW
 *            (train/optim.h), the schedule after every step or epoch
 *            (train/schedule.h). Validation every val_every epochs (and after
 *            the last): loss and ONE confusion matrix over every validation
 *            pixel -> per-class IoU, mIoU, OA (train/metrics.h). A NaN or
 *            infinite loss is an error naming the epoch and step; the
 *            checkpoints already written stay as they were.
 *
 * OUTPUT FOLDER (config `output`; created), every file written atomically:
 *   last.safetensors       checkpoint: every checkpoint_steps optimizer steps
 *                          (when > 0), at each epoch end, and when stopped
 *   epoch-N.safetensors    checkpoint after epoch N (1-based) every keep_every epochs
 *   best.safetensors       the model (weights + card, no optimizer state) at the
 *                          best validation mIoU so far; ts_model_load reads it
 *   model.safetensors      the final model with its card (ts_model_load reads it)
 *   smp/                   the final model as an SMP save_pretrained folder
 *   metrics.csv, metrics.json   one row/object per epoch
 *   curves.svg             train/val loss and val mIoU per epoch
 *
 * CHECKPOINT FORMAT (safetensors): the model's state_dict tensors
 * (ts_unet_to_dict), "optimizer.*" (ts_optim_save), "scheduler.*"
 * (ts_sched_save), and string metadata:
 *   terraseg.checkpoint   "1" (format version)
 *   terraseg.train_config the resolved configuration YAML
 *   terraseg.epoch        0-based epoch to continue in
 *   terraseg.next_batch   the first batch of that epoch not yet trained
 *   terraseg.global_step  optimizer steps taken
 *   terraseg.best_miou, terraseg.best_epoch (-1: none yet), terraseg.bad_epochs
 *   terraseg.seed         the config seed (shuffle/augmentation streams are
 *                         functions of (seed, epoch, position): no RNG state)
 *   terraseg.train_loss_sum, terraseg.train_loss_count  the epoch's running loss
 *   terraseg.history      the per-epoch metrics rows so far (JSON)
 *   plus terraseg.config / terraseg.card / format (ts_unet_set_model_card).
 * A checkpoint is only ever written at an optimizer-step boundary, so
 * resuming (opts.resume) restores the weights, BN statistics, AdamW moments
 * and step, the schedule, the loader position and the bookkeeping, and on the
 * CPU continues bit-identically to an uninterrupted run (same thread count).
 *
 * STOPPING: ts_train_request_stop() (async-signal-safe; the handlers that
 * opts.install_signals installs for SIGINT and SIGTERM call it) makes the
 * loop write last.safetensors at the next optimizer-step boundary and return
 * TS_OK with res->interrupted = the signal number. The CLI exits 130 after
 * SIGINT and 143 after SIGTERM (128 + signal, the shell convention). */
#ifndef TS_TRAIN_TRAINER_H
#define TS_TRAIN_TRAINER_H

#include <stdint.h>
#include <stdio.h>

#include "kernels/status.h"
#include "train/config.h"

struct ts_unet;

typedef struct ts_train_run_opts {
    const char *resume;        /* a checkpoint (last.safetensors, epoch-N.safetensors) or NULL */
    int install_signals;       /* 1: SIGINT/SIGTERM handlers during the run (restored after) */
    int progress;              /* -1 (default 0 = auto): auto (live line on a TTY); 0 plain lines; 1 live; 2 silent */
    FILE *log;                 /* NULL: stderr */
    int print_config;          /* 1: print the resolved configuration at start */
    /* test hooks */
    int64_t stop_after_steps;  /* > 0: behave as if SIGINT arrived once global_step reaches this */
    void (*on_step)(void *user, int epoch, int64_t global_step); /* after every optimizer step */
    /* with the model: once before the first step (global_step 0, or the
     * resumed step; the initialized model) and after every optimizer step
     * (after on_step, before that step's checkpoint); it may change it */
    void (*on_step_model)(void *user, struct ts_unet *m, int epoch, int64_t global_step);
    void *on_step_user;         /* the user argument of both hooks */
    /* NULL: the config's device (cpu, or cuda through ts_backend_get); else
     * this backend, whatever the config says (tests run the device path on
     * a fake-device backend this way) */
    const struct ts_backend *backend;
} ts_train_run_opts;

#define TS_TRAIN_MAX_CLASSES_REPORTED 64

typedef struct ts_train_result {
    int interrupted;      /* 0: ran to the end; else the signal number (SIGINT for stop_after_steps) */
    int early_stopped;    /* 1: patience ran out */
    int epochs_done;      /* complete epochs */
    int64_t global_step;  /* optimizer steps */
    int64_t skipped_steps; /* of those, this run's updates skipped by fp16 loss scaling (overflow) */
    size_t train_windows, val_windows;
    double train_loss;    /* the last complete epoch's mean training loss (NaN if none) */
    double val_loss, miou, oa; /* the last validation (NaN if none) */
    double best_miou;     /* NaN if no validation */
    int best_epoch;       /* 1-based, 0 if none */
    double seconds;
} ts_train_result;

void ts_train_run_opts_init(ts_train_run_opts *o);

/* Trains cfg (resolved and validated: ts_train_config_resolve). res may be NULL. */
ts_status ts_train_run(const ts_train_config *cfg, const ts_train_run_opts *o, ts_train_result *res);

/* Asks a running ts_train_run to checkpoint and stop (sig is reported in
 * res->interrupted). Async-signal-safe. */
void ts_train_request_stop(int sig);

#endif
