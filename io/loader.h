/* The batch loader: worker threads that read training samples through a
 * callback, augment them and hand out whole batches in a fixed order.
 *
 * What a batch holds
 *   image  float32 [B, C, H, W] (a ts_tensor view), mask int32 [B, H, W]
 *   (NULL with opts.skip_mask), valid uint8 [B, H, W] (nonzero = a pixel the
 *   loss and the photometric augmentations may use), the window index and the
 *   D4 transform of every sample. All tiles have the same size (opts.height x
 *   opts.width); a window of another size is refused at create time, by name.
 *
 * Reading
 *   Samples come from a ts_sample_read_fn, called concurrently from the
 *   loader's threads (worker = 0 .. workers-1, or 0 in synchronous mode), so a
 *   caller can keep one GDAL dataset handle per worker. Before each call the
 *   loader sets the image and the mask to 0 and valid to 1, so a callback
 *   without nodata may leave valid alone. A callback that fails returns a
 *   status and leaves a message in ts_last_error() (of its own thread); the
 *   loader copies it and ts_loader_next() returns it, prefixed with the sample
 *   index, its position in the epoch and its window, in the caller's thread.
 *   The callback must be deterministic (the same window gives the same data)
 *   for the guarantees below to hold end to end.
 *
 * Order and determinism
 *   Epoch e visits the windows in the order perm_e: the identity without
 *   shuffle, else a Fisher-Yates permutation seeded only by (seed, e). The
 *   sample at position p of epoch e is augmented with its own random stream,
 *   seeded by a hash of (seed, e, p); no random state is shared between
 *   samples or threads. Batches are handed out in order of position whatever
 *   order the workers finish in. So the batch sequence (pixels, masks, valid,
 *   indices, transforms) is bit-identical for any number of workers and any
 *   prefetch depth, and ts_loader_begin_epoch(l, e, k) yields exactly batches
 *   k, k+1, ... of a full epoch e: resuming from a checkpoint that stored
 *   (epoch, batch) continues the same sequence.
 *
 * Augmentation (every sample, when enabled; applied in this order)
 *   1. D4 (opts.aug.d4): one of the 8 symmetries of the square, uniformly:
 *      transform t in 0..7 reads output pixel (y, x) from input pixel
 *      (r, c) = (t & 4) ? (x, y) : (y, x) (transpose), then
 *      r = H-1-r if (t & 2) (vertical flip), c = W-1-c if (t & 1) (horizontal
 *      flip); that is, flip left-right if t & 1, up-down if t & 2, then
 *      transpose if t & 4. t = 0 is the identity, 1 the left-right flip, 2 the up-down
 *      flip, 3 the 180 degree rotation, 4 the transpose, 5 the 90 degree
 *      counter-clockwise rotation (numpy.rot90), 6 the clockwise one, 7 the
 *      anti-diagonal reflection. Transforms
 *      with a transpose need a square tile: when H != W only t in 0..3 (the
 *      identity, the two flips and the 180 degree rotation) are drawn.
 *      Image, mask and valid get the same transform.
 *   2. Contrast (opts.aug.contrast = c in [0, 1]): every channel is scaled
 *      around its mean over the valid pixels of this sample by a factor drawn
 *      uniformly from [1-c, 1+c] (one factor per sample, all channels).
 *   3. Brightness (opts.aug.brightness = b >= 0): a shift drawn uniformly
 *      from [-b, b] (one per sample, all channels) is added.
 *   4. Noise (opts.aug.noise_std = s >= 0): independent N(0, s^2) per value.
 *   2-4 touch only valid pixels and never the mask or valid; they act on the
 *   values the callback produced (normalize there, then brightness and noise
 *   are in units of the normalized data). A magnitude of 0 turns a step off;
 *   there is no separate probability: a draw near the identity (factor ~1,
 *   shift ~0, t = 0) is the "not applied" case.
 *
 * Threads and memory
 *   workers = 0 reads each batch in ts_loader_next(), in the caller's thread.
 *   workers > 0 starts that many pthreads (POSIX threads, not OpenMP: they
 *   wait on I/O; OpenMP's pool is for compute kernels) that keep up to
 *   `prefetch` batches ready beyond the one the caller holds. The loader owns
 *   (prefetch + 1) batch buffers with workers, one without, each
 *   B*(4C + 5)*H*W bytes (4C + 1 with skip_mask). A loader is used
 *   from one thread at a time (its workers aside). */
#ifndef TS_LOADER_H
#define TS_LOADER_H

#include <stddef.h>
#include <stdint.h>

#include "io/io.h"
#include "kernels/status.h"
#include "kernels/tensor.h"

/* Reads sample `index` (the window's index in the array given to
 * ts_loader_create), window *w, into image [C*H*W], mask [H*W] (NULL when
 * the loader has skip_mask) and valid [H*W]. Returns TS_OK, or a status with a
 * message in ts_last_error(). Called concurrently from several threads. */
typedef ts_status (*ts_sample_read_fn)(void *user, int worker, size_t index, const ts_window *w, float *image,
                                        int32_t *mask, uint8_t *valid);

typedef struct ts_augment_opts {
    int d4;           /* 1: a random dihedral transform per sample (4 of them on non-square tiles) */
    float contrast;   /* c in [0, 1]: factor U(1-c, 1+c) around the per-channel mean; 0 = off */
    float brightness; /* b >= 0: shift U(-b, b); 0 = off */
    float noise_std;  /* s >= 0: Gaussian noise N(0, s^2); 0 = off */
} ts_augment_opts;

typedef struct ts_loader_opts {
    int channels, height, width; /* tile shape: every window must be height x width */
    int batch_size;              /* >= 1 */
    int workers;                 /* loader threads, 0..64; 0 = synchronous in ts_loader_next */
    int prefetch;                /* batches read ahead of the one the caller holds, 1..64; 0 = 2 */
    int shuffle;                 /* 1: a (seed, epoch)-seeded permutation per epoch */
    uint64_t seed;               /* shuffle and augmentation */
    int drop_last;               /* 1: drop the last batch when it would be smaller than batch_size */
    int skip_mask;               /* 1: no masks (the callback gets mask == NULL, batch.mask is NULL) */
    ts_augment_opts aug;
} ts_loader_opts;

/* One batch. Every pointer is owned by the loader and valid until the next
 * ts_loader_next, ts_loader_begin_epoch or ts_loader_destroy. */
typedef struct ts_batch {
    ts_tensor image;        /* view [size, C, H, W] */
    int32_t *mask;          /* [size, H, W], or NULL with skip_mask */
    uint8_t *valid;         /* [size, H, W] */
    const size_t *indices;  /* [size]: window index of each sample */
    const int *transforms;  /* [size]: D4 transform of each sample (0 = identity; see above) */
    int size;               /* samples in this batch: batch_size, or fewer for the last one; 0 at the end */
    int epoch;
    size_t batch;           /* this batch's number within the epoch */
} ts_batch;

typedef struct ts_loader ts_loader;

/* Checks the options and every window, copies the windows, allocates the
 * buffers and starts the workers (which wait for ts_loader_begin_epoch). */
ts_status ts_loader_create(const ts_loader_opts *opts, const ts_window *windows, size_t n, ts_sample_read_fn fn,
                           void *user, ts_loader **out);

/* Starts epoch `epoch` (>= 0) at batch `start_batch` (0 .. batches_per_epoch;
 * > 0 resumes mid-epoch with exactly the batches a full epoch would give from
 * there). Abandons the current epoch if one is under way: waits for the
 * callbacks in progress to return and discards what was read ahead. */
ts_status ts_loader_begin_epoch(ts_loader *l, int epoch, size_t start_batch);

/* Waits for the next batch of the epoch and fills *out. At the end of the
 * epoch returns TS_OK with *end_of_epoch = 1 and out->size = 0 (again on
 * every later call); otherwise *end_of_epoch = 0. When a read failed, the
 * batches before the failing sample's batch come out normally, then this
 * returns the callback's status with a message naming the sample index, its
 * position and its window, and keeps returning it until the next
 * ts_loader_begin_epoch. */
ts_status ts_loader_next(ts_loader *l, ts_batch *out, int *end_of_epoch);

/* ceil(n / batch_size), or floor(n / batch_size) with drop_last. */
size_t ts_loader_batches_per_epoch(const ts_loader *l);

/* The window order of epoch `epoch` (perm[position] = window index, n
 * entries), as ts_loader_begin_epoch computes it. */
ts_status ts_loader_epoch_order(const ts_loader *l, int epoch, size_t *perm);

/* Stops the workers (also mid-epoch: the callbacks in progress return first)
 * and frees everything. NULL is allowed. */
void ts_loader_destroy(ts_loader *l);

#endif
