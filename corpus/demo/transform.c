/* The demo's transformer: every struct account (the array `accounts`, and
 * wherever else one lives) gets its loyalty points for past deposits. */
#include "upstare_transformers.h"

int xf_account(const struct account__old *old, struct account *new)
{
    new->points = 10L * old->deposits;
    return 0;
}
