/* The codecs' compiled kernels, behind vb_batch/codecs/kernels.py (import that module, not this one).
 *
 * Each function mirrors a numpy computation of the codecs, the same IEEE float32 operations in the same
 * order, and is tested bit for bit against it (tests/test_codec_kernels.py and the codec tests, through both
 * kernels). Built with -ffp-contract=off: a fused multiply-add would round once where numpy rounds twice.
 *
 * Arrays come in as contiguous buffers (numpy arrays; PyBUF_SIMPLE refuses strided ones) whose sizes are
 * checked against each other before any loop, so a wrong call raises ValueError instead of reading or writing
 * out of bounds. Loops run without the GIL: row threads decode in parallel.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>

#define TABLE_COLOURS (1 << 24)
#define BLOCKS_PER_SIDE 32

/* A colour's table key (codecs.base.colour_keys): block id (r/8, g/8, b/8) * 512 + place (r%8, g%8, b%8). */
static inline uint32_t table_key(const uint8_t *px) {
    uint32_t r = px[0], g = px[1], b = px[2];
    return ((r >> 3) << 19) | ((g >> 3) << 14) | ((b >> 3) << 9) | ((r & 7) << 6) | ((g & 7) << 3) | (b & 7);
}

/* A key's colour as float32 levels (codecs.base.key_colours). */
static inline void key_levels(uint32_t key, float *rgb) {
    rgb[0] = (float)((((key >> 19) & 31) << 3) | ((key >> 6) & 7));
    rgb[1] = (float)((((key >> 14) & 31) << 3) | ((key >> 3) & 7));
    rgb[2] = (float)((((key >> 9) & 31) << 3) | (key & 7));
}

static int check(int ok, const char *what) {
    if (!ok) PyErr_Format(PyExc_ValueError, "codecs kernels: %s", what);
    return ok;
}

static Py_ssize_t items(const Py_buffer *b, Py_ssize_t size) { return b->len / size; }

/* What a lookup shares: which pixels it visits, and where it notes the ones without an entry. */
typedef struct {
    Py_buffer pixels, only, seen, missing_keys, missing_at, counts;
} Lookup;

/* Release a call's buffers; None, or NULL with the error a check raised. */
static PyObject *done(Py_buffer *buffers, int count) {
    for (int i = 0; i < count; i++)
        if (buffers[i].obj) PyBuffer_Release(&buffers[i]);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}

/* The sizes a lookup needs: (P, 3) pixels, `only` indices (or none: every pixel), a bit per key, room for as
 * many distinct keys as pixels visited (at most 2**24) and for at least one missed pixel's index (note_missing
 * keeps as many as there is room for). Returns the number of pixels visited, or -1. */
static Py_ssize_t check_lookup(Lookup *l) {
    Py_ssize_t num_pixels = l->pixels.len / 3;
    Py_ssize_t visited = l->only.len ? items(&l->only, sizeof(Py_ssize_t)) : num_pixels;
    Py_ssize_t key_room = visited < TABLE_COLOURS ? visited : TABLE_COLOURS;
    if (!check(l->pixels.len % 3 == 0, "pixels must be (P, 3) uint8")
        || !check(l->seen.len == TABLE_COLOURS / 8, "seen must hold one bit per colour (2 MB)")
        || !check(items(&l->missing_at, sizeof(Py_ssize_t)) >= 1, "missing_at is empty")
        || !check(items(&l->missing_keys, sizeof(int32_t)) >= key_room, "missing_keys is too short")
        || !check(items(&l->counts, sizeof(Py_ssize_t)) == 2, "counts must hold 2 intp"))
        return -1;
    return visited;
}

/* Pixel i's colour has no entry: keep its key the first time the lookup meets it (one bit per key in `seen`),
 * so that the fill gets each missing colour once without a sort of every pixel's key, and its index while
 * `at` has room (`room` indices; past that the count goes on, and the caller looks every pixel up again). */
static inline void note_missing(uint32_t key, Py_ssize_t i, uint8_t *seen, int32_t *keys, Py_ssize_t *at,
                                Py_ssize_t room, Py_ssize_t *counts) {
    if (counts[0] < room) at[counts[0]] = i;
    counts[0]++;
    uint8_t bit = (uint8_t)(1u << (key & 7));
    if (!(seen[key >> 3] & bit)) {
        seen[key >> 3] |= bit;
        keys[counts[1]++] = (int32_t)key;
    }
}

/* Clear the bits note_missing set: `seen` (kept per thread) is all zeros again for the next lookup. */
static inline void forget_seen(uint8_t *seen, const int32_t *keys, const Py_ssize_t *counts) {
    for (Py_ssize_t n = 0; n < counts[1]; n++) seen[(uint32_t)keys[n] >> 3] = 0;
}

#define LOOKUP_FORMAT "y*y*"
#define LOOKUP_TAIL_FORMAT "w*w*w*w*"

/* depth_lookup(pixels, only, entries, depth_bits, confidence_bits, seen, missing_keys, missing_at, counts):
 * each visited pixel's uint64 entry unpacked into the float32 bits of depth and confidence (depth._unpack:
 * two inverted words, depth high); pixels whose entry is 0 (not computed yet) are noted as missing. */
static PyObject *depth_lookup(PyObject *self, PyObject *args) {
    Lookup l = {0};
    Py_buffer entries = {0}, depth_bits = {0}, confidence_bits = {0};
    if (!PyArg_ParseTuple(args, LOOKUP_FORMAT "y*w*w*" LOOKUP_TAIL_FORMAT, &l.pixels, &l.only, &entries,
                          &depth_bits, &confidence_bits, &l.seen, &l.missing_keys, &l.missing_at, &l.counts))
        return NULL;
    Py_buffer all[] = {l.pixels, l.only, entries, depth_bits, confidence_bits, l.seen, l.missing_keys,
                       l.missing_at, l.counts};
    Py_ssize_t num_pixels = l.pixels.len / 3, visited = check_lookup(&l);
    int bad_index = 0;
    if (visited >= 0 && check(entries.len == (Py_ssize_t)TABLE_COLOURS * 8, "entries must be 2**24 uint64")
        && check(items(&depth_bits, 4) == num_pixels && items(&confidence_bits, 4) == num_pixels,
                 "outputs must hold one float32 per pixel")) {
        const uint8_t *pixels = l.pixels.buf;
        const Py_ssize_t *only = l.only.buf;
        const uint64_t *table = entries.buf;
        uint32_t *depth_out = depth_bits.buf, *confidence_out = confidence_bits.buf;
        Py_ssize_t *counts = l.counts.buf, at_room = items(&l.missing_at, sizeof(Py_ssize_t));
        counts[0] = counts[1] = 0;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t k = 0; k < visited; k++) {
            Py_ssize_t i = l.only.len ? only[k] : k;
            if (i < 0 || i >= num_pixels) { bad_index = 1; break; }
            uint32_t key = table_key(pixels + 3 * i);
            uint64_t entry = table[key];
            depth_out[i] = (uint32_t)~(entry >> 32);
            confidence_out[i] = (uint32_t)~entry;
            if (entry == 0) note_missing(key, i, l.seen.buf, l.missing_keys.buf, l.missing_at.buf, at_room, counts);
        }
        forget_seen(l.seen.buf, l.missing_keys.buf, counts);
        Py_END_ALLOW_THREADS
        check(!bad_index, "only lists a pixel index out of range");
    }
    return done(all, 9);
}

/* segmentation_lookup(pixels, only, entries, class_of_entry, step, values, confidence, seen, missing_keys,
 * missing_at, counts): each visited pixel's uint32 entry, (candidate index + 1) << 16 | confidence steps,
 * unpacked into its class id (uint8 or uint16, as class_of_entry) and float32 confidence steps * step. */
static PyObject *segmentation_lookup(PyObject *self, PyObject *args) {
    Lookup l = {0};
    Py_buffer entries = {0}, class_of = {0}, values = {0}, confidence = {0};
    float step;
    if (!PyArg_ParseTuple(args, LOOKUP_FORMAT "y*y*fw*w*" LOOKUP_TAIL_FORMAT, &l.pixels, &l.only, &entries,
                          &class_of, &step, &values, &confidence, &l.seen, &l.missing_keys, &l.missing_at,
                          &l.counts))
        return NULL;
    Py_buffer all[] = {l.pixels, l.only, entries, class_of, values, confidence, l.seen, l.missing_keys,
                       l.missing_at, l.counts};
    Py_ssize_t num_pixels = l.pixels.len / 3, visited = check_lookup(&l);
    /* Class ids are uint8 or uint16, told apart by the output's size; class_of_entry has 65536 entries at
     * most (an entry's high half), so it is indexed through a bound. */
    Py_ssize_t id_size = num_pixels ? values.len / num_pixels : 1;
    Py_ssize_t num_classes = id_size ? class_of.len / id_size : 0;
    int bad_index = 0, bad_entry = 0;
    if (visited >= 0 && check(entries.len == (Py_ssize_t)TABLE_COLOURS * 4, "entries must be 2**24 uint32")
        && check((id_size == 1 || id_size == 2) && values.len == id_size * num_pixels
                 && class_of.len % id_size == 0, "values must be uint8 or uint16, one per pixel, as class_of_entry")
        && check(items(&confidence, 4) == num_pixels, "confidence must hold one float32 per pixel")) {
        const uint8_t *pixels = l.pixels.buf;
        const Py_ssize_t *only = l.only.buf;
        const uint32_t *table = entries.buf;
        float *confidence_out = confidence.buf;
        Py_ssize_t *counts = l.counts.buf, at_room = items(&l.missing_at, sizeof(Py_ssize_t));
        counts[0] = counts[1] = 0;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t k = 0; k < visited; k++) {
            Py_ssize_t i = l.only.len ? only[k] : k;
            if (i < 0 || i >= num_pixels) { bad_index = 1; break; }
            uint32_t key = table_key(pixels + 3 * i);
            uint32_t entry = table[key];
            uint32_t candidate = entry >> 16;
            if (candidate >= (uint32_t)num_classes) { bad_entry = 1; break; }
            if (id_size == 1)
                ((uint8_t *)values.buf)[i] = ((const uint8_t *)class_of.buf)[candidate];
            else
                ((uint16_t *)values.buf)[i] = ((const uint16_t *)class_of.buf)[candidate];
            confidence_out[i] = (float)(entry & 0xFFFFu) * step;
            if (entry == 0) note_missing(key, i, l.seen.buf, l.missing_keys.buf, l.missing_at.buf, at_room, counts);
        }
        forget_seen(l.seen.buf, l.missing_keys.buf, counts);
        Py_END_ALLOW_THREADS
        if (check(!bad_index, "only lists a pixel index out of range")) check(!bad_entry, "a table entry names no class");
    }
    return done(all, 10);
}

/* nearest_by_block(keys, coordinates, radii2, nearest_bound, farthest_bound, kept, packed):
 * block_search.nearest_of_colours of int32 table keys, packed as pack_nearest. Each run of keys in one 8x8x8
 * block searches the candidates that can be nearest or runner-up in it (nearest point of the block no farther
 * than the second-smallest farthest distance of any candidate), in id order, with nearest_among's running
 * minimum. coordinates: (C + 1, 3) float32; radii2: (C,) float32, black last; *_bound: (3, 32, C) int32. */
static PyObject *nearest_by_block(PyObject *self, PyObject *args) {
    Py_buffer keys = {0}, coordinates = {0}, radii2 = {0}, near = {0}, far = {0}, kept = {0}, packed = {0};
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*w*w*", &keys, &coordinates, &radii2, &near, &far, &kept, &packed))
        return NULL;
    Py_buffer all[] = {keys, coordinates, radii2, near, far, kept, packed};
    Py_ssize_t n = items(&keys, 4), c_count = items(&radii2, 4);
    int bad_key = 0;
    if (check(c_count >= 1 && items(&coordinates, 4) == 3 * (c_count + 1), "coordinates must be (C + 1, 3)")
        && check(items(&near, 4) == 3 * BLOCKS_PER_SIDE * c_count && items(&far, 4) == 3 * BLOCKS_PER_SIDE * c_count,
                 "bounds must be (3, 32, C) int32")
        && check(items(&kept, 4) >= c_count, "kept must hold C ids")
        && check(items(&packed, 4) == n, "packed must hold one uint32 per key")) {
        const uint32_t *key_of = keys.buf;
        const float *xyz = coordinates.buf, *r2 = radii2.buf;
        const int32_t *nb = near.buf, *fb = far.buf;
        int32_t *list = kept.buf;
        uint32_t *out = packed.buf;
        Py_ssize_t black = c_count - 1, side = BLOCKS_PER_SIDE * c_count;
        Py_BEGIN_ALLOW_THREADS
        Py_ssize_t start = 0;
        while (start < n) {
            uint32_t block = key_of[start] >> 9;
            if (key_of[start] >= TABLE_COLOURS) { bad_key = 1; break; }
            Py_ssize_t x = (block >> 10) * c_count, y = side + ((block >> 5) & 31) * c_count,
                       z = 2 * side + (block & 31) * c_count;
            int32_t smallest = INT32_MAX, second = INT32_MAX;
            for (Py_ssize_t c = 0; c < c_count; c++) {
                int32_t f = fb[x + c] + fb[y + c] + fb[z + c];
                if (f < smallest) { second = smallest; smallest = f; }
                else if (f < second) second = f;
            }
            Py_ssize_t width = 0;
            for (Py_ssize_t c = 0; c < c_count; c++)
                if (nb[x + c] + nb[y + c] + nb[z + c] <= second) list[width++] = (int32_t)c;
            Py_ssize_t end = start;
            for (; end < n && key_of[end] >> 9 == block; end++) {
                float rgb[3];
                key_levels(key_of[end], rgb);
                float d1 = INFINITY, d2 = INFINITY;
                int32_t nearest = 0;
                for (Py_ssize_t j = 0; j < width; j++) {
                    const float *at = xyz + 3 * list[j];
                    float dr = rgb[0] - at[0], dg = rgb[1] - at[1], db = rgb[2] - at[2];
                    float distance2 = (dr * dr + dg * dg) + db * db; /* exact integers below 2**24 */
                    if (distance2 < d1) nearest = list[j];
                    float runner_up = distance2 > d1 ? distance2 : d1;
                    d2 = runner_up < d2 ? runner_up : d2;
                    d1 = distance2 < d1 ? distance2 : d1;
                }
                float confidence = 0.0f;
                if (nearest != black && d1 <= r2[nearest])
                    confidence = 1.0f - sqrtf(d1) / sqrtf(d2);
                else
                    nearest = (int32_t)black;
                out[end] = ((uint32_t)(nearest + 1) << 16) | (uint32_t)rintf(confidence * 65535.0f);
            }
            start = end;
        }
        Py_END_ALLOW_THREADS
        check(!bad_key, "a key is not a table key");
    }
    return done(all, 7);
}

/* depth_walk(keys, starts, directions, steps, tie_margin, best_remaining, best_distance2): the walk step of
 * depth._depth_steps for table keys' colours. Per edge e: t = clip(sum over the channels it moves along of
 * (level - start) * step, 0, 1); the squared distance to the point t along it; remaining = (E - e) - t; the
 * earlier edge keeps a tie within tie_margin. Sums start at 0 and run in channel order, as Python's sum over
 * numpy arrays does. starts, directions, steps: (E, 3) float32. */
static PyObject *depth_walk(PyObject *self, PyObject *args) {
    Py_buffer keys = {0}, starts = {0}, directions = {0}, steps = {0}, remaining_out = {0}, distance_out = {0};
    float tie_margin;
    if (!PyArg_ParseTuple(args, "y*y*y*y*fw*w*", &keys, &starts, &directions, &steps, &tie_margin,
                          &remaining_out, &distance_out))
        return NULL;
    Py_buffer all[] = {keys, starts, directions, steps, remaining_out, distance_out};
    Py_ssize_t n = items(&keys, 4), edges = items(&starts, 4) / 3;
    if (check(edges >= 1 && items(&starts, 4) == 3 * edges && items(&directions, 4) == 3 * edges
              && items(&steps, 4) == 3 * edges, "starts, directions and steps must be (E, 3) float32")
        && check(items(&remaining_out, 4) == n && items(&distance_out, 4) == n, "outputs must hold one float32 per key")) {
        const uint32_t *key_of = keys.buf;
        const float *s = starts.buf, *d = directions.buf, *k = steps.buf;
        float *best_remaining = remaining_out.buf, *best_distance2 = distance_out.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n; i++) {
            float rgb[3];
            key_levels(key_of[i] & (TABLE_COLOURS - 1), rgb);
            float remaining_i = 0.0f, distance2_i = 0.0f;
            for (Py_ssize_t e = 0; e < edges; e++) {
                const float *se = s + 3 * e, *de = d + 3 * e, *ke = k + 3 * e;
                float along = 0.0f;
                for (int c = 0; c < 3; c++)
                    if (de[c] != 0.0f) along = along + (rgb[c] - se[c]) * ke[c];
                float t = along > 0.0f ? along : 0.0f;
                t = t < 1.0f ? t : 1.0f;
                float distance2 = 0.0f;
                for (int c = 0; c < 3; c++) {
                    float offset = rgb[c] - se[c];
                    if (de[c] != 0.0f) offset = offset - t * de[c];
                    distance2 = distance2 + offset * offset;
                }
                float remaining = (float)(edges - e) - t;
                if (e == 0) {
                    remaining_i = remaining;
                    distance2_i = distance2;
                } else {
                    if (distance2 < distance2_i * tie_margin) remaining_i = remaining;
                    distance2_i = distance2 < distance2_i ? distance2 : distance2_i;
                }
            }
            best_remaining[i] = remaining_i;
            best_distance2[i] = distance2_i;
        }
        Py_END_ALLOW_THREADS
    }
    return done(all, 6);
}

/* normals_unit(pixels, signs, constants, values, exponent): normals.decode's unit_vectors for (P, 3) uint8
 * pixels into (P, 3) float32 values in the frame of `signs` (float32 +-1); exponent gets the confidence's exp
 * argument, -inf where the colour has no direction (exp gives the 0 numpy's where writes), so numpy's own exp
 * finishes the confidence with the same bits. constants: float32 (2 / 255, MIN_NORM, QUANTISATION_SLACK,
 * -0.5 / NORM_SIGMA**2). */
static PyObject *normals_unit(PyObject *self, PyObject *args) {
    Py_buffer pixels = {0}, signs = {0}, constants = {0}, values = {0}, exponent = {0};
    if (!PyArg_ParseTuple(args, "y*y*y*w*w*", &pixels, &signs, &constants, &values, &exponent)) return NULL;
    Py_buffer all[] = {pixels, signs, constants, values, exponent};
    Py_ssize_t n = pixels.len / 3;
    if (check(pixels.len % 3 == 0, "pixels must be (P, 3) uint8")
        && check(items(&signs, 4) == 3 && items(&constants, 4) == 4, "signs must be 3 and constants 4 float32")
        && check(items(&values, 4) == 3 * n && items(&exponent, 4) == n, "values must be (P, 3), exponent (P,)")) {
        const uint8_t *px = pixels.buf;
        const float *sign = signs.buf, *k = constants.buf;
        float *out = values.buf, *exponent_out = exponent.buf;
        float to_raw = k[0], min_norm = k[1], slack = k[2], factor = k[3];
        int flip[3] = {sign[0] != 1.0f, sign[1] != 1.0f, sign[2] != 1.0f};
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n; i++) {
            float raw[3];
            for (int c = 0; c < 3; c++) raw[c] = (float)px[3 * i + c] * to_raw - 1.0f;
            float length = sqrtf((raw[0] * raw[0] + raw[1] * raw[1]) + raw[2] * raw[2]);
            /* Both sides computed and one kept (no branch: the loop vectorises). */
            int has_direction = length >= min_norm;
            float scale = has_direction ? 1.0f / fmaxf(length, min_norm) : NAN;
            float excess = fmaxf(fabsf(length - 1.0f) - slack, 0.0f); /* never NaN for uint8 colours */
            exponent_out[i] = has_direction ? excess * excess * factor : -INFINITY;
            for (int c = 0; c < 3; c++) out[3 * i + c] = raw[c] * (flip[c] ? -scale : scale);
        }
        Py_END_ALLOW_THREADS
    }
    return done(all, 5);
}

static PyMethodDef methods[] = {
    {"depth_lookup", depth_lookup, METH_VARARGS, "depth._unpack of each pixel's table entry, noting the missing."},
    {"segmentation_lookup", segmentation_lookup, METH_VARARGS, "segmentation's unpack of each pixel's entry."},
    {"nearest_by_block", nearest_by_block, METH_VARARGS, "block_search.nearest_of_colours of table keys, packed."},
    {"depth_walk", depth_walk, METH_VARARGS, "the walk step of depth._depth_steps for table keys' colours."},
    {"normals_unit", normals_unit, METH_VARARGS, "normals.decode's unit vectors and confidence exponents."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernels", "The codecs' compiled kernels (see vb_batch/codecs/kernels.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
